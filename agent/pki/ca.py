"""Loading, validating and creating the CA the local issuer signs with.

Sources: a certificate and key file pair, a directory holding a mounted Secret (``ca.crt`` +
``ca.key`` as in the seed's custom-CA setup, or a ``kubernetes.io/tls`` Secret's ``tls.crt`` +
``tls.key``), PEM bytes, or a self-signed CA the agent creates once in its state directory.
Every source is validated the same way so a bad CA fails at start with a message naming the file.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from agent.errors import FailedPrecondition
from agent.pki.keys import PrivateKey, load_private_key, signing_hash
from agent.pki.serials import format_serial

log = logging.getLogger(__name__)

SELF_SIGNED_LIFETIME = dt.timedelta(days=3650)
CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CAError(FailedPrecondition):
    """The configured CA cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class CertificateAuthority:
    """A signing CA: its certificate, its key, and the certificates above it (nearest first)."""

    certificate: x509.Certificate
    private_key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def root(self) -> x509.Certificate:
        """The top of what we know: the last chain certificate, or the CA itself."""
        return self.chain[-1] if self.chain else self.certificate

    # Encoded once per CA (a frozen object; a rotation makes a new one): every issuance uses them.
    @functools.cached_property
    def cert_pem(self) -> bytes:
        return _pem(self.certificate)

    @functools.cached_property
    def trust_pem(self) -> bytes:
        """What relying parties should trust (the root); goes into volumes' ``ca.crt``."""
        return _pem(self.root)

    @functools.cached_property
    def intermediates_pem(self) -> bytes:
        """``intermediates()`` as PEM: what follows the leaf in a volume's ``tls.crt``."""
        return b"".join(_pem(c) for c in self._intermediates)

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def is_self_signed(self) -> bool:
        return is_self_signed(self.certificate)

    def intermediates(self) -> list[x509.Certificate]:
        """Certificates a leaf's chain must carry: the signing CA and chain, minus a self-signed
        root (relying parties have it in ca.crt; sending it would only cost bytes)."""
        return list(self._intermediates)

    @functools.cached_property
    def _intermediates(self) -> tuple[x509.Certificate, ...]:
        # Worked out once per CA: each self-signature check is a signature verification, and
        # every issuance asks (a new CA, after a rotation, is a new object).
        return tuple(c for c in (self.certificate, *self.chain) if not is_self_signed(c))


class CAProvider(Protocol):
    """Where the local issuer gets its CA; implementations may reload it (Secret rotation)."""

    def current(self) -> CertificateAuthority: ...

    def trust_bundle_pem(self) -> bytes:
        """The PEM bundle written into volumes' ``ca.crt``."""
        ...


class StaticCAProvider:
    """One CertificateAuthority, loaded once."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self._ca = ca

    def current(self) -> CertificateAuthority:
        return self._ca

    def trust_bundle_pem(self) -> bytes:
        return self._ca.trust_pem


def load_ca_pem(
    cert_pem: bytes, key_pem: bytes, source: str, *, now: dt.datetime | None = None
) -> CertificateAuthority:
    """A validated CA from PEM bytes; ``source`` names where they came from in errors.

    The certificate PEM may hold a bundle: the signing CA first, then the certificates above it.
    """
    return _build(cert_pem, key_pem, f"{source} (certificate)", f"{source} (key)", now)


def load_ca_files(
    cert_file: Path, key_file: Path, *, now: dt.datetime | None = None
) -> CertificateAuthority:
    """A validated CA from a certificate (bundle) file and a key file."""
    return _build(_read(cert_file), _read(key_file), str(cert_file), str(key_file), now)


def load_ca_dir(directory: Path, *, now: dt.datetime | None = None) -> CertificateAuthority:
    """A validated CA from a mounted Secret: ``ca.crt`` + ``ca.key``, or ``tls.crt`` + ``tls.key``.

    With ``tls.*`` (a cert-manager-made CA Secret), ``ca.crt`` holds the issuer of ``tls.crt``:
    certificates from it that extend the chain upwards are added to it.
    """
    if (directory / CA_KEY_NAME).exists():
        return load_ca_files(directory / CA_CERT_NAME, directory / CA_KEY_NAME, now=now)
    if (directory / "tls.key").exists():
        ca = load_ca_files(directory / "tls.crt", directory / "tls.key", now=now)
        extra_file = directory / CA_CERT_NAME
        if not extra_file.exists():
            return ca
        extra = _parse_certs(_read(extra_file), str(extra_file))
        chain = extend_chain(ca.certificate, list(ca.chain), extra)
        return CertificateAuthority(ca.certificate, ca.private_key, tuple(chain))
    raise CAError(
        f"CA directory {directory} holds neither {CA_CERT_NAME} + {CA_KEY_NAME} "
        "nor tls.crt + tls.key"
    )


def ensure_self_signed_ca(
    state_dir: Path,
    common_name: str = "cert-agent local CA",
    *,
    now: dt.datetime | None = None,
) -> CertificateAuthority:
    """The agent's own CA in ``state_dir``: created on the first call, reused afterwards.

    ECDSA P-256, ten years, CA:TRUE pathlen 0. ``ca.key`` is written 0600 atomically before
    ``ca.crt`` (0644), so a crash never leaves a certificate without its key. An expired CA is
    replaced; a damaged one (key not matching) is an error, so an operator decides.
    """
    now = now or utcnow()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_file, key_file = state_dir / CA_CERT_NAME, state_dir / CA_KEY_NAME
    with _locked(state_dir / ".ca.lock"):
        if cert_file.exists() and key_file.exists():
            existing = _parse_certs(_read(cert_file), str(cert_file))[0]
            if existing.not_valid_after_utc > now:
                return load_ca_files(cert_file, key_file, now=now)
            log.warning("self-signed CA in %s expired; creating a new one", state_dir)
        ca = _make_self_signed(common_name, now)
        key_pem = ca.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(key_file, key_pem, 0o600)
        write_atomic(cert_file, ca.cert_pem, 0o644)
        log.info("created self-signed CA %s in %s", _describe(ca.certificate), state_dir)
        return ca


def validate_ca(
    ca: CertificateAuthority, cert_source: str, key_source: str, now: dt.datetime
) -> None:
    """Raise ``CAError`` unless ``ca`` can sign now: key matches, CA:TRUE, keyCertSign, in date,
    and each chain certificate issued the one below it."""
    cert = ca.certificate
    if _spki(cert.public_key()) != _spki(ca.private_key.public_key()):
        raise CAError(
            f"the private key in {key_source} does not match the certificate in {cert_source}"
        )
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise CAError(
            f"the certificate in {cert_source} ({_describe(cert)}) is not a CA certificate: "
            "it needs basicConstraints CA:TRUE"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None  # RFC 5280: no KeyUsage extension means no restriction
    if usage is not None and not usage.key_cert_sign:
        raise CAError(
            f"the certificate in {cert_source} ({_describe(cert)}) may not sign certificates: "
            "its keyUsage lacks keyCertSign"
        )
    if cert.not_valid_after_utc <= now:
        raise CAError(
            f"the CA certificate in {cert_source} ({_describe(cert)}) expired at "
            f"{cert.not_valid_after_utc.isoformat()}"
        )
    if cert.not_valid_before_utc > now:
        raise CAError(
            f"the CA certificate in {cert_source} ({_describe(cert)}) is not valid before "
            f"{cert.not_valid_before_utc.isoformat()}; check the node's clock"
        )
    below = cert
    for above in ca.chain:
        try:
            below.verify_directly_issued_by(above)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CAError(
                f"the chain in {cert_source} is out of order or incomplete: {_describe(above)} "
                f"did not issue {_describe(below)} ({exc})"
            ) from exc
        below = above


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a same-directory temporary file created with ``mode``
    (never wider, whatever the umask) and renamed over it, then fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o600)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _build(
    cert_pem: bytes, key_pem: bytes, cert_source: str, key_source: str, now: dt.datetime | None
) -> CertificateAuthority:
    certs = _parse_certs(cert_pem, cert_source)
    try:
        key = load_private_key(key_pem)
    except (ValueError, TypeError) as exc:
        raise CAError(
            f"{key_source} does not hold a usable unencrypted PEM private key (RSA, ECDSA or "
            f"Ed25519): {exc}"
        ) from exc
    ca = CertificateAuthority(certs[0], key, tuple(certs[1:]))
    validate_ca(ca, cert_source, key_source, now or utcnow())
    return ca


def _parse_certs(pem: bytes, source: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CAError(f"{source} does not hold a PEM certificate: {exc}") from exc


def extend_chain(
    signer: x509.Certificate, chain: list[x509.Certificate], candidates: list[x509.Certificate]
) -> list[x509.Certificate]:
    """Append candidates that issued the current top, until none does (or a root is reached)."""
    top = chain[-1] if chain else signer
    while not is_self_signed(top):
        for cand in candidates:
            if cand == top or cand in chain or cand.subject != top.issuer:
                continue
            try:
                top.verify_directly_issued_by(cand)
            except (ValueError, TypeError, InvalidSignature):
                continue
            chain.append(cand)
            top = cand
            break
        else:
            break
    return chain


def _make_self_signed(common_name: str, now: dt.datetime) -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before = now.replace(microsecond=0)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + SELF_SIGNED_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, signing_hash(key))
    )
    return CertificateAuthority(cert, key)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock so two agent processes never create two CAs in one directory."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {format_serial(cert.serial_number)}"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
