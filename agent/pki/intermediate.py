"""The node's intermediate CA: its CSR, and the CA built from what the issuer returns.

The CSR asks for everything a careful issuer would put into a node CA: CA:TRUE with pathLen 0 (the
node CA signs leaves only), keyCertSign + cRLSign + digitalSignature, and the name constraints.
Issuers copy what they honour; cert-manager's CA issuer copies the name constraints but not the
path length, which is why the agent refuses to sign CA certificates with a node CA itself.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.pki.ca import CAError, CertificateAuthority, extend_chain, validate_ca
from agent.pki.keys import PrivateKey, signing_hash

# cert-manager usage names, in the CertificateRequest's spec.usages.
NODE_CA_USAGES = ("cert sign", "crl sign", "digital signature")


def node_ca_common_name(node: str) -> str:
    """``cert-agent node <node>``, cut to the 64 characters a CN may hold."""
    return f"cert-agent node {node}"[:64]


def generate_node_ca_key() -> ec.EllipticCurvePrivateKey:
    """ECDSA P-256: small, fast to sign with, accepted by every TLS stack."""
    return ec.generate_private_key(ec.SECP256R1())


def build_node_ca_csr(
    key: PrivateKey, common_name: str, constraints: x509.NameConstraints
) -> bytes:
    """A PEM CSR for a leaf-signing intermediate CA limited to ``constraints``."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(constraints, critical=True)
    )
    csr = builder.sign(key, signing_hash(key))
    return csr.public_bytes(serialization.Encoding.PEM)


# The issuer's clock may run ahead of the node's: a node CA "not valid yet" by up to this much is
# accepted rather than thrown away and requested again.
CLOCK_SKEW = dt.timedelta(minutes=5)


def node_ca_from_issued(
    key: PrivateKey, chain_pem: bytes, ca_pem: bytes, source: str, now: dt.datetime
) -> CertificateAuthority:
    """The signing CA from an issued ``status.certificate`` (node CA first, then any chain) and
    ``status.ca`` (the root). Validated like every CA: key matches, CA:TRUE, keyCertSign, in date
    (within ``CLOCK_SKEW`` of its notBefore), each certificate issued by the next."""
    try:
        issued = x509.load_pem_x509_certificates(chain_pem)
        roots = x509.load_pem_x509_certificates(ca_pem) if ca_pem.strip() else []
    except ValueError as exc:
        raise CAError(f"{source} does not hold PEM certificates: {exc}") from exc
    chain = extend_chain(issued[0], list(issued[1:]), roots)
    ca = CertificateAuthority(issued[0], key, tuple(chain))
    not_before = issued[0].not_valid_before_utc
    if now < not_before <= now + CLOCK_SKEW:
        now = not_before
    validate_ca(ca, f"{source} (certificate)", f"{source} (node key)", now)
    return ca


def encode_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
