"""Sigstore key pairs as cosign and skopeo write them, and ECDSA P-256 signing and verification.

The private key file is a PEM block ``ENCRYPTED SIGSTORE PRIVATE KEY`` (cosign also writes
``ENCRYPTED COSIGN PRIVATE KEY``; both are read) whose body is the JSON of
go-securesystemslib's ``encrypted`` package::

    {"kdf": {"name": "scrypt", "params": {"N": 32768, "r": 8, "p": 1}, "salt": "<base64>"},
     "cipher": {"name": "nacl/secretbox", "nonce": "<base64>"},
     "ciphertext": "<base64>"}

The key is ``scrypt(passphrase, salt, N, r, p, 32)``; the plaintext is the PKCS#8 DER private key. The
public key is a PKIX ``PUBLIC KEY`` PEM block. Signatures are ASN.1 DER ECDSA over SHA-256 of the payload,
base64 in the ``dev.cosignproject.cosign/signature`` annotation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from worker.registry import InvalidInput

# cryptography is imported where it is used: a copy under an accept-anything policy never loads it
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PRIVATE_KEY_PEM_TYPES = ("ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY")
#: what Ferry writes (the type skopeo 1.9 and containers/image write)
PRIVATE_KEY_PEM_TYPE = "ENCRYPTED SIGSTORE PRIVATE KEY"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 32768, 8, 1
_MAX_SCRYPT_N = 1 << 20

PublicKey: TypeAlias = "ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey"


@dataclass(frozen=True)
class KeyPair:
    private_pem: bytes
    public_pem: bytes


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    lines = data.decode("ascii", errors="replace").splitlines()
    kind: str | None = None
    body: list[str] = []
    for line in lines:
        line = line.strip()
        if kind is None and line.startswith("-----BEGIN ") and line.endswith("-----"):
            kind, body = line[len("-----BEGIN ") : -5], []
        elif kind is not None and line == f"-----END {kind}-----":
            try:
                out.append((kind, base64.b64decode("".join(body), validate=True)))
            except ValueError:
                raise InvalidInput(f"malformed PEM block {kind!r}") from None
            kind = None
        elif kind is not None and ":" not in line:
            body.append(line)
    return out


def _pem(kind: str, der: bytes) -> bytes:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return ("\n".join([f"-----BEGIN {kind}-----", *lines, f"-----END {kind}-----"]) + "\n").encode()


def _scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    if not (1 < n <= _MAX_SCRYPT_N and n & (n - 1) == 0) or not (0 < r <= 32) or not (0 < p <= 16):
        raise InvalidInput(f"unsupported scrypt parameters N={n} r={r} p={p} in the private key")
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=128 * n * r * p + (1 << 24))


def encrypt_private_key(der: bytes, passphrase: bytes) -> bytes:
    """go-securesystemslib ``encrypted.Encrypt``: scrypt key derivation, NaCl secretbox."""
    from nacl.secret import SecretBox

    salt = os.urandom(32)
    nonce = os.urandom(24)
    key = _scrypt(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    ciphertext = SecretBox(key).encrypt(der, nonce).ciphertext
    doc = {
        "kdf": {
            "name": "scrypt",
            "params": {"N": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
            "salt": base64.b64encode(salt).decode(),
        },
        "cipher": {"name": "nacl/secretbox", "nonce": base64.b64encode(nonce).decode()},
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }
    return json.dumps(doc).encode()


def decrypt_private_key(blob: bytes, passphrase: bytes) -> bytes:
    from nacl.exceptions import CryptoError
    from nacl.secret import SecretBox

    try:
        doc: Any = json.loads(blob)
        kdf, cipher = doc["kdf"], doc["cipher"]
        if kdf["name"] != "scrypt" or cipher["name"] != "nacl/secretbox":
            raise InvalidInput(f"unsupported private key encryption {kdf['name']}/{cipher['name']}")
        params = kdf["params"]
        salt = base64.b64decode(kdf["salt"])
        nonce = base64.b64decode(cipher["nonce"])
        ciphertext = base64.b64decode(doc["ciphertext"])
        n, r, p = int(params["N"]), int(params["r"]), int(params["p"])
    except (ValueError, KeyError, TypeError):
        raise InvalidInput("malformed encrypted private key") from None
    key = _scrypt(passphrase, salt, n, r, p)
    try:
        return bytes(SecretBox(key).decrypt(ciphertext, nonce))
    except (CryptoError, ValueError):
        raise InvalidInput("cannot decrypt the private key: wrong passphrase?") from None


def generate_key_pair(passphrase: bytes) -> KeyPair:
    """A new ECDSA P-256 key pair: the encrypted private key PEM and the public key PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return KeyPair(_pem(PRIVATE_KEY_PEM_TYPE, encrypt_private_key(der, passphrase)), public)


class PrivateKey:
    """A decrypted sigstore signing key (ECDSA P-256 as cosign makes them; also RSA and Ed25519)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def load(cls, data: bytes, passphrase: bytes) -> PrivateKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

        blocks = [(k, b) for k, b in _pem_blocks(data) if k in PRIVATE_KEY_PEM_TYPES]
        if not blocks:
            raise InvalidInput(f"not a sigstore private key (expected a PEM block {PRIVATE_KEY_PEM_TYPE!r})")
        der = decrypt_private_key(blocks[0][1], passphrase)
        try:
            key = serialization.load_der_private_key(der, password=None)
        except ValueError:
            raise InvalidInput("the decrypted private key is not a PKCS#8 key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise InvalidInput(f"unsupported private key type {type(key).__name__}")
        return cls(key)

    def sign(self, payload: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15

        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(payload, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(payload, PKCS1v15(), hashes.SHA256())
        return key.sign(payload)

    def public_key(self) -> PublicKey:
        return self._key.public_key()


def load_public_keys(data: bytes, what: str) -> list[PublicKey]:
    """Every ``PUBLIC KEY`` in a PEM file (containers/image accepts one key per file; Ferry any number)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    keys: list[PublicKey] = []
    for kind, der in _pem_blocks(data):
        if kind != "PUBLIC KEY":
            continue
        try:
            key = serialization.load_der_public_key(der)
        except ValueError:
            raise InvalidInput(f"{what}: malformed public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
            raise InvalidInput(f"{what}: unsupported public key type {type(key).__name__}")
        keys.append(key)
    if not keys:
        raise InvalidInput(f"{what}: no PEM 'PUBLIC KEY' block")
    return keys


def verify_signature(keys: list[PublicKey], payload: bytes, signature: bytes) -> bool:
    """True when any of ``keys`` made ``signature`` over ``payload``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15

    for key in keys:
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, payload, PKCS1v15(), hashes.SHA256())
            else:
                key.verify(signature, payload)
            return True
        except InvalidSignature:
            continue
    return False
