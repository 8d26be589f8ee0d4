"""Private key generation, encoding and loading for the key types a volume may ask for.

Keys are generated on the node and never leave it; only the CSR does. Encoded keys are PEM and
unencrypted because the volume's file modes (0440, group = fs-group) protect them, as in
cert-manager's csi-driver.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.errors import InvalidArgument
from agent.spec.model import KeyAlgorithm, KeyEncoding, KeySpec

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_SUPPORTED = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)

RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
RSA_DEFAULT_BITS = 2048
ECDSA_DEFAULT_SIZE = 256

_CURVES: dict[int, type[ec.EllipticCurve]] = {
    256: ec.SECP256R1,
    384: ec.SECP384R1,
    521: ec.SECP521R1,
}


def generate_private_key(spec: KeySpec) -> PrivateKey:
    """A fresh key of the algorithm and size ``spec`` names.

    Raises ``InvalidArgument`` (attribute ``key-size``) for a size the algorithm does not support.
    """
    if spec.algorithm is KeyAlgorithm.RSA:
        bits = RSA_DEFAULT_BITS if spec.size is None else spec.size
        if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
            raise InvalidArgument(
                f"key-size {bits} is not supported for RSA: use {RSA_MIN_BITS} to {RSA_MAX_BITS}",
                attribute="key-size",
            )
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if spec.algorithm is KeyAlgorithm.ECDSA:
        size = ECDSA_DEFAULT_SIZE if spec.size is None else spec.size
        curve = _CURVES.get(size)
        if curve is None:
            raise InvalidArgument(
                f"key-size {size} is not supported for ECDSA: use 256, 384 or 521",
                attribute="key-size",
            )
        return ec.generate_private_key(curve())
    if spec.algorithm is KeyAlgorithm.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    raise InvalidArgument(f"unknown key-algorithm {spec.algorithm!r}", attribute="key-algorithm")


def encode_private_key(key: PrivateKey, encoding: KeyEncoding) -> bytes:
    """Unencrypted PEM: PKCS1 (RSA only) is `BEGIN RSA PRIVATE KEY`, PKCS8 `BEGIN PRIVATE KEY`."""
    if encoding is KeyEncoding.PKCS1:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise InvalidArgument(
                "key-encoding PKCS1 is only possible for RSA keys: use PKCS8",
                attribute="key-encoding",
            )
        fmt = serialization.PrivateFormat.TraditionalOpenSSL
    elif encoding is KeyEncoding.PKCS8:
        fmt = serialization.PrivateFormat.PKCS8
    else:
        raise InvalidArgument(f"unknown key-encoding {encoding!r}", attribute="key-encoding")
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def load_private_key(pem: bytes) -> PrivateKey:
    """Parse an unencrypted PEM key (PKCS1, SEC1 or PKCS8).

    Raises ``ValueError`` for unreadable data or a key type the agent does not support.
    """
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key


def key_matches_spec(key: PrivateKey, spec: KeySpec) -> bool:
    """Whether ``key`` has the algorithm and size ``spec`` asks for (reuse-private-key keeps it only
    then: a volume whose key-algorithm or key-size changed gets a new key)."""
    if spec.algorithm is KeyAlgorithm.RSA:
        bits = RSA_DEFAULT_BITS if spec.size is None else spec.size
        return isinstance(key, rsa.RSAPrivateKey) and key.key_size == bits
    if spec.algorithm is KeyAlgorithm.ECDSA:
        size = ECDSA_DEFAULT_SIZE if spec.size is None else spec.size
        return isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size == size
    if spec.algorithm is KeyAlgorithm.ED25519:
        return isinstance(key, ed25519.Ed25519PrivateKey)
    return False


def signing_hash(key: PrivateKey) -> hashes.SHA256 | None:
    """The digest to sign with: SHA-256 for RSA and ECDSA, none for Ed25519 (it hashes itself)."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
